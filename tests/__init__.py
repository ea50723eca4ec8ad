"""The project's tests. A package, so that ``tests.*`` imports find these modules and not the ``tests``
package that torch-fidelity 0.4.0 installs into site-packages."""
