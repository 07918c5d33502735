"""The fine-tuning pipeline behind the `deltatune` command: config -> data -> train -> evaluate -> report.

Needs the `pipeline` extras (accelerate, datasets, pyyaml, tqdm, matplotlib, scikit-learn,
sacrebleu, rouge-score): pip install 'deltatune[pipeline]'.
"""
