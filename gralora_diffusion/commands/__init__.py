"""One module per `gralora-diffusion` sub-command: HELP, add_arguments(parser), run(args)."""
