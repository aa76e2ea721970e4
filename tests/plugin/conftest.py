"""The example project is run by test_example_project.py as an outside project, not collected
here."""

collect_ignore = ["example_project"]
