"""The relay process (``pubsub_relay``): its server, its PostgreSQL session, its wire protocol."""
