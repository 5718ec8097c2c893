"""The emulated lab: every host a network namespace, every device↔edge link shaped, devices slowed to class speed."""
