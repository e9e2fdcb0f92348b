"""The project's own integration harness (private: not part of the public API).

A throw-away Orthanc archive, a qrscp Query/Retrieve archive, fault-injecting proxies, a TLS
front, vendor login servers, deterministic DICOM generators and the demo. The tests, `make
demo` and the benchmarks use it; users who want to test their own code against the Trolley
use the small, dependency-free fakes of :mod:`trolley_etl.testing` instead.

Some modules need the `test` extra (numpy for the generators, cryptography for the
certificates); a missing one is an
ImportError that says how to get it.
"""
