import time
from pathlib import Path

HELP = "Offline demo of the main job: train a GraLoRA adapter on samples/ with the tiny SDXL pretrained on the drawn world, write the adapter and a before/after grid, print fidelity, recontextualization and prior numbers."
PROMPT = "a photo of sks teapot"
STEPS = 150
LEARNING_RATE = 1e-3
SAMPLES = Path(__file__).resolve().parents[2] / "samples"  # the repository's samples/ (editable install)


def add_arguments(parser):
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart_output"), help="where everything goes (default quickstart_output)")
    parser.add_argument("--instance_data_dir", type=Path, default=SAMPLES, help="images to train on (default: the repository's samples/)")
    parser.add_argument("--max_train_steps", type=int, default=STEPS, help=f"updates (default {STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed for the training and the samples (default 0)")


def run(args) -> int:
    from ..train import TrainConfig, train
    from ..outputs import claim_folder
    from ..quiet import quiet_libraries
    from ..threads import announce
    from ..train.data import load_image, scan_images
    from ..world.draw import SIZE
    from ..world.evaluator import WorldEvaluator
    from ..world.measure import quickstart_scores, sample_set
    from ..bases import load_base

    start = time.perf_counter()
    out = args.output_dir
    cfg = TrainConfig(
        pretrained_model_name_or_path="world", instance_data_dir=str(args.instance_data_dir), instance_prompt=PROMPT,
        output_dir=str(out), resolution=SIZE, random_flip=True, train_batch_size=2, max_train_steps=args.max_train_steps,
        learning_rate=LEARNING_RATE, rank=8, gralora_k=2, seed=args.seed, checkpointing_steps=max(1, args.max_train_steps),
        validation_prompt=PROMPT, num_validation_images=4, num_inference_steps=20,
        # DreamBooth's prior preservation: teapots drawn by the world model keep the class (and the rest) in place
        with_prior_preservation=True, class_prompt="a photo of a teapot", class_data_dir=str(out / "class_images"),
        num_class_images=16, sample_batch_size=16,
        overwrite_output_dir=True,  # quickstart's own folder (claimed below): a rerun replaces the demo
    )
    cfg.validate()  # bad flags fail before anything is written
    claim_folder(out, "quickstart", "--output_dir", protected=[args.instance_data_dir])  # the output rule: new, empty or ours
    instances = scan_images(cfg.instance_data_dir, cfg.instance_prompt)
    announce()  # the CPU thread choice, once the arguments have passed
    print("1/4 Loading the tiny SDXL pretrained on the drawn world (shipped weights) ...")
    with quiet_libraries():  # only our own bars: no component-loading bars from the libraries
        pipe, _ = load_base("world", device="cpu", dtype="fp32", say=None)
    print("2/4 Sampling the grid's prompts before training ...")
    before = sample_set(pipe)
    print(f"3/4 Training a GraLoRA adapter (r=8, k=2) on {args.instance_data_dir} for {args.max_train_steps} steps at {SIZE} px, batch 2 ...")
    result = train(cfg, pipeline=pipe)
    print("4/4 Sampling the same prompts and seeds after training ...")
    after = sample_set(result.pipeline)
    evaluator = WorldEvaluator.load()
    references = [load_image(record.path) for record in instances]
    scores = {"before": quickstart_scores(evaluator, references, before), "after": quickstart_scores(evaluator, references, after)}
    grid = out / "before_after.png"
    before_after_grid(before, after).save(grid)
    _report(args, result, scores, grid, out, time.perf_counter() - start)
    return 0


def before_after_grid(before: dict, after: dict, seeds=(0, 1), zoom: int = 2):
    """Rows: the prompts; columns: seeds before training, then the same seeds after."""
    from ..grids import labelled_grid

    def big(image):
        return image.resize((image.width * zoom, image.height * zoom), resample=0)  # nearest: show the pixels

    rows = [[big(before[p][s]) for s in seeds] + [big(after[p][s]) for s in seeds] for p in before]
    columns = [f"before, seed {s}" for s in seeds] + [f"after, seed {s}" for s in seeds]
    return labelled_grid(rows, list(before), columns)


def _report(args, result, scores, grid, out, seconds) -> None:
    from ..world.measure import SEEDS

    n = max(1, min(10, len(result.losses) // 2))
    first, last = sum(result.losses[:n]) / n, sum(result.losses[-n:]) / n
    b, a = scores["before"], scores["after"]
    print(f"Done in {seconds:.0f} s. Loss (mean of {n} steps): {first:.3f} at the start, {last:.3f} at the end.")
    print(f"  subject fidelity (evaluator-embedding cosine to samples/, {SEEDS} seeds of {PROMPT!r}): {b['fidelity']:.3f} -> {a['fidelity']:.3f}")
    print(f"  recontextualization (background recognized, 'on green stripes' / 'on checks', {2 * SEEDS} images): {a['recontext']:.0%} (before: {b['recontext']:.0%})")
    print(f"  prior preservation ('a photo of a blue ball' is a blue ball, {SEEDS} seeds): {b['prior']:.0%} -> {a['prior']:.0%}")
    print(f"  grid:     {grid}  (rows: prompts; columns: before / after, same seeds)")
    print(f"  adapter:  {result.weights_path}")
    print(f"  samples:  {result.grid_path}  (4 seeds of {PROMPT!r})")
    print(f"  card:     {out / 'README.md'}")
    print(f"  settings: {out / 'training_config.yaml'}  (reusable with --config)")
    if (out / "logs").is_dir():  # TensorBoard logs only when the package is installed (train's --report_to default)
        print(f"  logs:     tensorboard --logdir {out / 'logs'}")
    else:
        print("  logs:     none (pip install tensorboard, and training writes TensorBoard logs)")
    print("Next: train on your own photos of a subject (GPU recommended):")
    print("  gralora-diffusion train --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\")
    print('      --instance_data_dir my_photos --instance_prompt "a photo of sks dog" --resolution 1024 \\')
    print("      --max_train_steps 500 --validation_prompt \"a photo of sks dog in a bucket\" --output_dir my_adapter")
    print("  (or `accelerate launch scripts/train_dreambooth_gralora_sdxl.py` with the same flags; README.md, section Training)")
