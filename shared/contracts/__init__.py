"""The contracts between stages: subjects and names, message headers, dead letters."""
