"""Image classification: pre-activation ResNets and MobileNetV2 on Fashion-MNIST, CIFAR-10 or image folders."""
