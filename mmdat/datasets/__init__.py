from .synthetic import CLASSES, SEG_CLASSES, make_synthetic_dataset

__all__ = ['CLASSES', 'SEG_CLASSES', 'make_synthetic_dataset']
