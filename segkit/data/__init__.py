"""Mask formats, layouts, datasets, augmentation and dataset inspection."""
