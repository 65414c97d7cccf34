"""What a run tells people: the report card of a run (report_card.py) and the model card of its
checkpoint (model_card.py)."""
