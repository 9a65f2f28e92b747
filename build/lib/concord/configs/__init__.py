"""The example configs, shipped with the package: ``concord train --config demo`` finds ``demo.yaml`` here."""
