"""SQLAlchemy: Engines as resources, Sessions joined to a branch."""
