"""The Label Studio ML-backend adapter (protocol app, JSON <-> mask conversion, training jobs).

Not written yet: see the backend issue. Only `model/` may be imported from here.
"""
