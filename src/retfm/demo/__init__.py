"""``retfm demo``: what a federation of hospitals gains, shown end to end (:mod:`retfm.demo.run`), and its
options (:mod:`retfm.demo.config`, light to import: the command line builds its options from them)."""

from retfm.demo.config import QUICK, DemoConfig

__all__ = ["QUICK", "DemoConfig"]
