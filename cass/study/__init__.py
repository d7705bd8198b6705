"""``cass study``: does self-supervised pretraining pay on this dataset, and which recipe?

A study runs each method (no pretraining, the paper's CASS recipe, its variants, DINO) x label fraction x seed
x network through the platform's own stages (``pretrain``, ``finetune``, ``evaluate``) on the configured data,
then answers with statistics, a stated decision rule, a self-contained HTML report and a recommendation that
``pretrain.variant: auto`` follows for this data version. docs/study.md explains how to run and read it.

- :mod:`cass.study.methods`: the named recipes (settings changes) a study compares;
- :mod:`cass.study.plan`: the cells of a study, their folders, and what is already done (resume);
- :mod:`cass.study.cells`: one pretraining (shared by the fractions and networks of a method and seed) and one
  cell, through the stage functions;
- :mod:`cass.study.stats`: mean ± sd, paired differences, the decision rule, what the test split can resolve;
- :mod:`cass.study.report`: the plot and the offline HTML report;
- :mod:`cass.study.recommend`: the settings fragment and the record ``pretrain.variant: auto`` reads;
- :mod:`cass.study.tracking`: every MLflow call of a study (a parent run, a child run per cell);
- :mod:`cass.study.runner`: the study in this process (the Prefect flow ``flows/study.py`` runs the same steps
  as tasks).
"""
