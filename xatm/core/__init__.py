"""The protocol's vocabulary: ids, records, decisions, steps, events, deadlines, URLs."""
