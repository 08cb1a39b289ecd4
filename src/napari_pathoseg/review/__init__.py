"""Teacher pseudo-labels: the review project on disk, generation, editing (split/merge).

:mod:`.project` gathers the public names; the code is in :mod:`.records` (on-disk format),
:mod:`.store` (:class:`~napari_pathoseg.review.store.ReviewProject`), :mod:`.tile_files`,
:mod:`.scoring`, :mod:`.editing`, :mod:`.sources` and :mod:`.generate`.
"""
