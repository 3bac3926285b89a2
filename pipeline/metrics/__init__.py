"""What a prediction scores against its label: semantic (class areas, mIoU), camouflaged-object (cod),
panoptic quality and mask AP, and the COCO label files they read."""
