"""krul: efficient state restoration for multi-turn conversations (arXiv 2507.08045).

Dependencies point one way: cli -> experiments -> engine -> (restore, store, estimator, policies)
-> (selector, scheduler, compression, similarity) ; adapter is the only module that touches
transformers internals.
"""
__version__ = "0.1.0"
