"""Post-training: what comes after pre-training (issue 28).

So far: Self-Lengthen's text filters (`lcx.posttrain.self_lengthen`). Supervised
fine-tuning on conversations, the ProLong recipe and the Self-Lengthen rounds build on
them.
"""
