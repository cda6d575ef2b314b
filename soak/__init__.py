"""`make soak`: the relay as a real process under concurrent clients, SIGKILLed and restarted,
every reader's log checked against the journal (see soak.run and soak.checker)."""
