"""M1: malignancy classification and region segmentation from mixed labels (A -> B -> C).

See ``docs/model_card_malignancy.md`` and ``docs/methods.md`` (M1). Modules: ``network``
(U-Net encoder classifier, U-Net segmenter, presets), ``model`` (loader, :class:`MalignancyModel`),
``data`` (built-in table from the shared data, the user's label formats), ``train`` (the
resumable A -> B -> C run on the training engine), ``evaluate`` and ``release``.
"""
