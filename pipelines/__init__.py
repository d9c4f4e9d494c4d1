"""The stage CLIs of DATE on Ray, one per stage (``python pipelines/<stage>.py`` or the installed
``date-<stage>`` command): the app, kept apart from the library :mod:`date_core`."""
