"""Synthetic multi-center HECKTOR-like PET/CT: one head-and-neck phantom seen by each center.

Real HECKTOR data cannot be shipped, so tests, examples and the leave-one-center-out
experiment run on this generator. A case is one patient drawn from its own seed, then acquired
by a center: CT and PET sampled on their own grids, blurred, noised and calibrated, the label
drawn on the CT grid in the center's contouring style. Output follows the HECKTOR 2022 layout
(``imagesTr/<ID>__CT.nii.gz``, ``imagesTr/<ID>__PT.nii.gz``, ``labelsTr/<ID>.nii.gz``).

- :mod:`~centerprompt.data.synthetic.profiles`: :class:`CenterProfile`, the seven default
  centers and :func:`load_profiles` for new ones;
- :mod:`~centerprompt.data.synthetic.anatomy`: shapes, tissues and :func:`sample_patient`;
- :mod:`~centerprompt.data.synthetic.scanner`: a center's acquisition, :func:`make_case`;
- :mod:`~centerprompt.data.synthetic.writer`: NIfTI files and :func:`generate_dataset`.
"""
