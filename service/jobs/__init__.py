"""Job kinds: export, convert, import and the hand-off to hyper2kvm, composed from the
providers, the disk libraries and the KVM end. The engine runs them; D-Bus is above."""
