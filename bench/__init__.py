"""Side-by-side benchmark: our engine vs transformers.Trainer + peft on the same data (`make bench`)."""
