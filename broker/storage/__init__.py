"""Durable storage of the broker: task rows in SQL, the database thread, the payload spool."""
