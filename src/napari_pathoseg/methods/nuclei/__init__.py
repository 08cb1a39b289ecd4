"""M2 nucleus segmentation: AttCycle teacher, TransCycle student, instances, whole-slide segmentation, training, fine-tuning."""
