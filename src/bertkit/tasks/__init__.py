"""Fine-tuning tasks (GLUE, SQuAD, custom classification) and their metrics."""
