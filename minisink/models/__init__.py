"""One file per architecture. Each is self-contained: diff two of them to see what differs."""
