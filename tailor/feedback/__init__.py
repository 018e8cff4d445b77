"""The feedback loop: what users said about the served answers, back into training data.

store.py    the database the server writes (SQLite by default, any SQLAlchemy URL)
export.py   corrections → supervised conversations, (worse, better) answers → preference pairs
"""
