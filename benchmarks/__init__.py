"""Benchmarks: what atomicity across PostgreSQL and MariaDB costs with xatm and without it.

``python -m benchmarks.run`` (or ``make bench``) starts private durable servers, runs a
transfer workload (debit a row in PostgreSQL, credit a row in MariaDB) in several commit
modes interleaved on the same servers, and writes the results table to
``docs/benchmarks.md``. ``python -m benchmarks.profile`` breaks one xatm transaction down
into its round trips, log force and Python overhead.

Modules:

* ``env``     -- the servers (private or given by URL) and the account tables;
* ``modes``   -- the commit modes compared (``MODES``: name -> factory; add new ones there);
* ``floor``   -- the durable floor's decision file (``raw-durable``: preallocated, group commit);
* ``aio_modes``, ``aio_driver`` -- the asyncio modes, run as tasks on one event loop;
* ``mp``, ``mp_child`` -- the multi-process modes, run as child coordinator processes;
* ``catalog`` -- every mode by name;
* ``driver``  -- runs one mode with N client threads for a timed window;
* ``servermeter`` -- the servers' CPU time and fsyncs during the window;
* ``report``  -- aggregates rounds, renders Markdown / JSON / PNG;
* ``run``     -- the command line;
* ``profile`` -- per-phase timing and py-spy sampling of xatm's commit;
* ``saga_profile`` -- a saga's client CPU by phase, with a cProfile, against ``onepc``;
* ``logscale`` -- CPU per forced decision as threads grow: the file log against the floor's
  decision file, without servers.
"""
