"""M4, NegGuide MIL: slide classification from slide labels, with a tile heat map.

Core (networks, cohort CSV, entropy filter, Sinkhorn, training, pooling, loader):
:mod:`.network`, :mod:`.cohort_csv`, :mod:`.entropy`, :mod:`.sinkhorn`, :mod:`.data`,
:mod:`.train`, :mod:`.baseline`, :mod:`.pooling`, :mod:`.model`, :mod:`.release`,
:mod:`.evaluate`. Slides, CLI and dock: :mod:`.predictor`, :mod:`.classify`.
"""
