"""Training concerns, each in its own piece: optimisers and schedule, logging, distributed set-up, the loops."""
