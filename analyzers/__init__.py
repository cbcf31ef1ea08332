"""Pure analyses over the event frames (``ringwatch.analyzers``)."""
