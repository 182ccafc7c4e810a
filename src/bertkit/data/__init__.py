"""Data: corpus reading and pretraining examples, GLUE and SQuAD readers."""
