// Runs an AOTInductor package of a model that uses attnpool's ops, without Python:
//   run_package <attnpool library> <model.pt2> <inputs.pt> <outputs.pt> [device]
// Loading attnpool's compiled library (attnpool/_C*.so) registers its ops with torch's
// dispatcher; the package calls them by name. inputs.pt holds the model's flat list of input
// tensors, as Python's torch.save writes it; the outputs are written the same way, for
// Python's torch.load.
#include <dlfcn.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

static std::vector<char> read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(std::string("cannot read ") + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::cerr << "usage: " << argv[0]
              << " <attnpool library> <model.pt2> <inputs.pt> <outputs.pt> [device]\n";
    return 2;
  }
  // RTLD_LAZY: the library's Python module init (which this program never calls) names a
  // few Python functions; lazy binding leaves them unresolved.
  if (dlopen(argv[1], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 1;
  }
  try {
    const c10::Device device(argc == 6 ? argv[5] : "cpu");  // the package's device
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    std::vector<at::Tensor> inputs;
    for (const auto& value : torch::pickle_load(read_file(argv[3])).toList()) {
      inputs.push_back(value.get().toTensor().to(device));
    }
    const std::vector<at::Tensor> outputs = loader.run(inputs);
    std::vector<c10::IValue> values;  // a tuple: torch.load(weights_only=True) reads it
    for (const auto& t : outputs) values.emplace_back(t.cpu());
    const std::vector<char> bytes = torch::pickle_save(c10::ivalue::Tuple::create(values));
    std::ofstream(argv[4], std::ios::binary).write(bytes.data(), bytes.size());
    std::cout << "ran " << argv[2] << ": " << inputs.size() << " inputs, " << outputs.size()
              << " outputs\n";
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
