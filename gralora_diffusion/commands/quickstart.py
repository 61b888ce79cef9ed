from pathlib import Path

HELP = "Offline demo on the embedded tiny SDXL: add GraLoRA, generate a sample image at several scales."


def add_arguments(parser):
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart_output"), help="where images go")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import torch
    from diffusers.utils import make_image_grid

    from ..inject import add_gralora
    from ..summary import adapter_summary, format_summary
    from ..tiny import tiny_sdxl_pipeline

    args.output_dir.mkdir(parents=True, exist_ok=True)
    print("1/3 Building the tiny SDXL pipeline offline (random weights) ...")
    pipe = tiny_sdxl_pipeline(seed=args.seed)
    print("2/3 Adding GraLoRA (r=8, k=2) to the UNet and both text encoders ...")
    add_gralora(pipe, r=8, gralora_k=2, text_encoder_targets="attn")
    with torch.no_grad():  # an untrained adapter is a no-op (B = 0): give it random B to see it act
        for name, p in pipe.unet.named_parameters():
            if "gralora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(args.seed))
    print(format_summary(adapter_summary(pipe)))
    print("3/3 Generating 'a photo of sks teapot' at adapter scales 0, 0.5, 1 ...")
    images = [
        pipe(
            "a photo of sks teapot",
            num_inference_steps=4,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(args.seed),
            cross_attention_kwargs={"scale": scale},
        ).images[0]
        for scale in (0.0, 0.5, 1.0)
    ]
    grid_path = args.output_dir / "scale_grid.png"
    make_image_grid(images, rows=1, cols=3).save(grid_path)
    print(f"Done. Wrote {grid_path} (columns: scale 0, 0.5, 1).")
    print("Next: run the tests with `pytest -q`, or read README.md for the Python API.")
    return 0
