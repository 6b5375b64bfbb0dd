"""Data: corpus -> documents -> train/val ArrayRecord splits -> tokenizer -> grain batches.

corpus.py (sources, document cutting), splits.py (stable split, on-disk cache),
tokenizer.py (sentencepiece), packing.py (concat-then-split rows), pipeline.py (the
public entry points: prepare, make_iterator, eval_iterator, iterator_state,
restore_iterator, token_counts).
"""
