"""``python -m espo_lightning.compare --config conf/compare.yaml --out DIR``: methods x seeds run one
after another, then ``DIR/report.md`` with the paper's figures and claims (see ``__main__``)."""
