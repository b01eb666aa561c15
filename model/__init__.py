"""The pure, I/O-free core shared by the relay and the client kit.

Wire frames, canonical signing bytes, crypto envelopes, the hash chain and the sequencer's
assignment rules. Nothing here imports trio, psycopg or sockets; everything is deterministic
given its inputs (randomness comes only from libsodium's CSPRNG in the sealing helpers).
"""
