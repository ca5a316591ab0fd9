"""LeNet-5 (LeCun et al. 1998) in its modern fully connected form.

    input 32x32x1 -> conv 5x5, 6 -> ReLU -> max-pool 2 -> conv 5x5, 16 -> ReLU ->
    max-pool 2 -> 400 -> 120 -> 84 -> 10                     61,706 parameters

Differences from the 1998 network, as in most modern re-implementations: ReLU
instead of the scaled tanh, max pooling instead of the trainable subsampling
layers, C3 fully connected to S2 (not the sparse connection table), and a plain
linear output layer instead of the Gaussian (RBF) connections.  Layer sizes and
therefore the parameter count are the paper's fully connected variant.
"""
from .. import nn
from ._registry import check_input_size, named, register_model


@register_model
def lenet5(num_classes=10, in_channels=1, input_size=32):
    """LeNet-5 for 32x32 inputs; ``input_size=28`` (MNIST) pads the first
    convolution by 2 so the rest of the network sees the same shapes."""
    check_input_size("lenet5", input_size, (28, 32))
    pad = (32 - input_size) // 2
    model = named(
        ("conv1", nn.Conv2d(in_channels, 6, 5, padding=pad)),  # C1: 28x28x6
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),                            # S2: 14x14x6
        ("conv2", nn.Conv2d(6, 16, 5)),                        # C3: 10x10x16
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),                            # S4: 5x5x16
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120)),                   # C5
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)),                           # F6
        ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),                   # output
    )
    # PyTorch's default layer initialisation (U(+-1/sqrt(fan_in))), which LeCun's
    # own fan-in scaled uniform initialisation resembles.
    return model
