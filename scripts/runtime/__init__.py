"""Run-time guards: settings, one-line errors, safe output folders and files, command lines, progress."""
