"""The readers behind :mod:`qmig.wire.reader`, one module per part of the grammar.

* :mod:`.buffer`: bytes fed in, kept in reused buffers;
* :mod:`.records`: the :class:`~.records.Record` values and sentinels the readers return;
* :mod:`.framing`: where the stream reader is in the grammar and how it runs a schema;
* :mod:`.stream`: the stream header, CONFIGURATION, sections, commands and packages;
* :mod:`.ram_section`: the records of the ``ram`` section;
* :mod:`.device_sections`: device state and the VMDESCRIPTION after EOF;
* :mod:`.return_path`: the destination-to-source messages.

Import the readers from :mod:`qmig.wire.reader`.
"""
