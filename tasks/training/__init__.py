"""Fine-tuning: recipes (one loss builder each), the trainer, and training data from every
source."""
