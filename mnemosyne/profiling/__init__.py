"""`mnemosyne profile`: measure step times through the real executor and fit a latency model."""
