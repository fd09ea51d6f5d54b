"""``python -m dynconvert``: the command line (also under ``accelerate launch -m dynconvert``)."""

from dynconvert.cli import main

if __name__ == "__main__":
    main()
