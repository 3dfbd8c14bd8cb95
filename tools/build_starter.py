"""Rebuild the starter pair under examples/models/starter/ (`make starter`); see kronos.train.starter."""

from kronos.train.starter import main

if __name__ == "__main__":
    raise SystemExit(main())
