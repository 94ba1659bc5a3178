"""`python -m medclf` and `accelerate launch -m medclf JOB SPEC.yaml ...`."""

from medclf.cli import main

if __name__ == "__main__":
    main()
