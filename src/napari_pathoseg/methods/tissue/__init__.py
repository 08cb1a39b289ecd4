"""M5: weakly supervised tissue segmentation from patch-level labels (WSSS with online noise suppression).

Modules: :mod:`.network` (ResNet-38-style backbone, the multi-label classifier with progressive
dropout attention, PSPNet, presets), :mod:`.labels` (patch-label readers), :mod:`.data`
(WSSS4LUAD split, the grey > 210 background rule), :mod:`.cam` (Grad-CAM++ pseudo masks),
:mod:`.train` (stage 1 and stage 2 tasks, online noise suppression), :mod:`.pipeline` (both
stages as one resumable run), :mod:`.model` (checkpoint schema and loader), :mod:`.predictor`
and :mod:`.segment` (whole-slide inference). See ``docs/tissue.md``.
"""
