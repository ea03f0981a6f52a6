"""The `cropper-engine` command line (work in progress)."""

import click


@click.group()
def main() -> None:
    """cropper-engine: crop images with an open VLM through in-context learning."""


if __name__ == "__main__":
    main()
