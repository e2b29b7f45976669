"""The application wing of mergelab: the ``mergelab`` command line (:mod:`mergelab_app.cli`) and
the notebook runner behind ``mergelab report`` (:mod:`mergelab_app.report`).

It sits above the other wings: it calls the library (``mergelab``), the Prefect flows
(``mergelab_flows``) and executes the notebooks that import the figure builders
(``mergelab_figures``); none of them imports it.
"""
