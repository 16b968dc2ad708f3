"""Training data: dataset layouts, probing, pure sampling functions, the dataset, batching and video io."""
from .pipeline import *  # noqa: F401,F403
from .pipeline import _open_image  # noqa: F401
